"""The Gradio GUI: score one case through a form generated from the model's schema, see why, and
read the model card. The same file runs the Hugging Face Space (`make space` builds its folder).

It scores with the local model folder (ARTIFACTS/model), or, with RAREML_API_URL set, through a
running API (`make serve`), which also logs the prediction; both give the same answers.
Run: `make gui` (http://127.0.0.1:7860), or `python app.py --artifacts artifacts --port 7860`.
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home when the app starts
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import gradio as gr
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from rareml import registry
from rareml.errors import RareMLError
from rareml.features import CATEGORICAL, Feature
from rareml.model import Model, load_model
from rareml.scoring import ApiScorer, LocalScorer

SHOWN = 8  # the most important features get the form; the others wait, pre-filled, in "More features"
# The model card's figures, row by row: the wide one alone, the others in pairs (alt text for each)
REPORTS = ({"pr_roc.png": "Precision-recall and ROC curves on the test split"},
           {"reliability.png": "Reliability diagram: calibrated and uncalibrated probabilities",
            "threshold.png": "Precision, recall and the chosen metric by threshold"},
           {"shap_importance.png": "Global feature importance: mean absolute SHAP value"})
MAX_FILE_SIZE = 2**20  # bytes: the app takes no files, but Gradio's upload route would store one of any size


def feature_order(model: Model) -> list[Feature]:
    """Features by global importance (mean |SHAP| on the test split), most important first."""
    importance = model.manifest.get("importance", {})
    return sorted(model.schema.features, key=lambda f: -importance.get(f.name, 0.0))


def widget(f: Feature) -> gr.components.Component:
    if f.kind == CATEGORICAL:
        return gr.Dropdown(choices=list(f.categories), value=f.typical, label=f.name, allow_custom_value=True,
                           elem_id=f"f-{f.name}", info=f"{len(f.categories)} levels seen in training")
    return gr.Number(value=f.typical, label=f.name, elem_id=f"f-{f.name}",
                     info=f"training range {f.min:g} to {f.max:g}; empty = unknown")


def to_record(features: list[Feature], values: tuple, sensitive: dict | None = None) -> dict:
    """Form values -> the JSON record the API takes (an empty field is null: unknown)."""
    record = {f.name: (None if v in ("", None) else v) for f, v in zip(features, values)}
    return record | (sensitive or {})


def contribution_plot(answer: dict) -> plt.Figure:
    top = answer["explanation"]["top"][::-1]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(top) + 1.2))
    values = [t["contribution"] for t in top]
    ax.barh([f"{t['feature']} = {t['value']}"[:48] for t in top], values,
            color=["#c0392b" if v > 0 else "#2471a3" for v in values])
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("log-odds contribution (red: towards positive)")
    fig.tight_layout()
    return fig


def verdict(answer: dict, model: Model) -> str:
    t = model.manifest["threshold"]
    p, threshold = answer["probability"], answer["threshold"]
    decision = "positive" if answer["decision"] else "negative"
    return (f"**Decision: {decision}** (probability {p:.4f} {'≥' if answer['decision'] else '<'} threshold "
            f"{threshold:.4f}, chosen for {t['metric']}).\n\nWhat the threshold means, on validation: of the cases "
            f"it flags, **{t['precision']:.0%}** are truly positive (precision); of all positive cases, it flags "
            f"**{t['recall']:.0%}** (recall).")


def model_card(model: Model) -> str:
    m = model.manifest
    test, ci = m["metrics"]["test"], m["metrics"]["test_ci"]
    rows = "".join(f"| {k} | {v:.4f} | [{ci[k][0]:.4f}, {ci[k][1]:.4f}] |\n" for k, v in test.items() if k in ci)
    return (f"## {m['name']}, version {model.version}\n\n{describe_family(model)}\n\n"
            f"Trained {m['trained_at']}; {m['calibration']['method']} "
            f"calibration; threshold {model.threshold:.4f} ({m['threshold']['metric']}).\n\n"
            f"| test metric | value | 95% interval |\n|---|---|---|\n{rows}\n"
            f"No-skill average precision (the positive rate): {m['metrics']['no_skill']['average_precision']:.4f}.")


def describe_family(model: Model) -> str:
    """Which families the model is, with weights, and each searched family's out-of-fold average precision."""
    weights = ", ".join(f"{m.family} {m.weight:.2f}" for m in model.members)
    text = f"Model: **{model.kind}**" + (f" (weights {weights})" if len(model.members) > 1 else "") + "."
    families = (model.manifest.get("selection") or {}).get("families", {})
    if families:
        text += " Out-of-fold average precision: " + "; ".join(
            f"{name} {f['oof_average_precision']:.4f} [{f['oof_average_precision_ci'][0]:.4f}, "
            f"{f['oof_average_precision_ci'][1]:.4f}]" for name, f in families.items()) + "."
    return text


def fairness_rows(model: Model) -> list[list]:
    return [[attribute, group, r["n"], round(r["selection_rate"], 4), round(r["true_positive_rate"], 4)]
            for attribute, groups in model.manifest["metrics"].get("fairness", {}).items() for group, r in groups.items()]


def figures(reports: Path) -> None:
    """The model card's figures (those in `reports`), each whole at its own aspect, never enlarged:
    a gallery's square thumbnails cropped the wide ones. Each figure carries its title, so no label."""
    for row in REPORTS:
        shown = {name: alt for name, alt in row.items() if (reports / name).is_file()}
        if not shown:
            continue
        with gr.Row(equal_height=False):
            for name, alt in shown.items():
                gr.Image(str(reports / name), show_label=False, alt_text=alt, interactive=False, format="png",
                         buttons=["fullscreen", "download"], elem_id=f"report-{Path(name).stem}")


def build(artifacts: Path, api_url: str | None = None) -> gr.Blocks:
    """The app over ARTIFACTS/model (and ARTIFACTS/reports for the model card)."""
    model = load_model(registry.serving_dir(artifacts))  # the champion, as the API serves
    scorer = ApiScorer(api_url) if api_url else LocalScorer(model)
    features = feature_order(model)
    examples = model.examples()
    extras = [a for a in model.schema.sensitive if a not in model.schema.names]

    def predict(*values):
        try:
            answer = scorer.score(to_record(features, values[:len(features)],
                                            dict(zip(extras, values[len(features):]))))
        except RareMLError as exc:
            raise gr.Error(str(exc)) from None
        return f"{answer['probability']:.6f}", verdict(answer, model), contribution_plot(answer)

    def load_example(outcome: str, counter: int):
        cases = examples.get(outcome, [])
        if not cases:
            raise gr.Error(f"this model folder has no {outcome} examples")
        case = cases[counter % len(cases)]
        note = f"Loaded {outcome} example {counter % len(cases) + 1} of {len(cases)} (held-out test case)."
        return [case.get(f.name) for f in features] + [case.get(a) for a in extras] + [counter + 1, note]

    with gr.Blocks(title=f"rareml: {model.manifest['name']}") as demo:
        gr.Markdown(f"# {model.manifest['name']}\nProbability that **{model.schema.target}** is "
                    f"**{model.schema.positive}**, calibrated, with the decision at the production threshold.")
        with gr.Tab("Score a case"):
            with gr.Row():
                with gr.Column(scale=3):
                    with gr.Row():
                        outcome = gr.Radio(["positive", "negative"], value="positive", label="Example outcome",
                                           elem_id="example-outcome")
                        load = gr.Button("Load a real example", elem_id="load-example")
                    note = gr.Markdown(elem_id="example-note")
                    inputs = [widget(f) for f in features[:SHOWN]]
                    with gr.Accordion(f"More features ({len(features) - SHOWN}), pre-filled with typical values",
                                      open=False):
                        inputs += [widget(f) for f in features[SHOWN:]]
                        inputs += [gr.Textbox(label=a, elem_id=f"f-{a}") for a in extras]
                    go = gr.Button("Predict", variant="primary", elem_id="predict")
                with gr.Column(scale=2):
                    probability = gr.Textbox(label="Probability (calibrated)", elem_id="probability")
                    decision = gr.Markdown(elem_id="decision")
                    gr.Markdown("**This case's top contributions** (log-odds: SHAP values for trees, "
                                "coefficient times value for a linear member)")
                    plot = gr.Plot(show_label=False)
            counter = gr.State(0)
            go.click(predict, inputs, [probability, decision, plot], api_name="predict")
            load.click(load_example, [outcome, counter], inputs + [counter, note], api_name="load_example")
        with gr.Tab("Model card"):
            gr.Markdown(model_card(model))
            figures(artifacts / "reports")
            gr.Dataframe(fairness_rows(model), headers=["attribute", "group", "n", "selection rate",
                                                        "true-positive rate"], label="Fairness on the test split")
    return demo


def launch(demo: gr.Blocks, **options) -> None:
    """Serve the app as `make gui` and the Space do: uploads capped at MAX_FILE_SIZE (413 beyond)."""
    demo.launch(max_file_size=MAX_FILE_SIZE, theme=gr.themes.Soft(), **options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, default=Path(os.environ.get("ARTIFACTS", "artifacts")))
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    args = parser.parse_args()
    try:
        demo = build(args.artifacts, os.environ.get("RAREML_API_URL"))
    except RareMLError as exc:
        raise SystemExit(f"error: {exc}") from None
    launch(demo, server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
