"""The MLflow pyfunc flavour of a rareml model, logged as "model from code" (no pickle).

MLflow executes this file when it loads the model; `set_model` at the end is what it looks for.
The model folder travels as an artifact and is loaded (and checksum-verified) by `load_model`.
"""
import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class RareMLPyfunc(PythonModel):
    """Records in; calibrated probability and thresholded decision out."""

    def load_context(self, context):
        from rareml.model import load_model

        self.model = load_model(context.artifacts["model_dir"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        p = self.model.predict_proba(model_input)
        return pd.DataFrame({"probability": p, "decision": (p >= self.model.threshold).astype(int)})


mlflow.models.set_model(RareMLPyfunc())
