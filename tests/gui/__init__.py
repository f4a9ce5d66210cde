"""The Gradio GUI through gradio_client, locally and against the API, the Space folder run as the Space runs it, and a real Chromium driving the page."""
