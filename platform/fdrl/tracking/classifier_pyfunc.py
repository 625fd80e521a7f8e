"""The MLflow "model from code" of a registered classifier (see ``fdrl.tracking.classifiers``).

    model = mlflow.pyfunc.load_model("models:/classifier-mnist@candidate")
    logits = model.predict(images)  # (N, C, H, W) float32 in [-1, 1] -> (N, classes) logits
"""

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class ClassifierModel(PythonModel):
    def load_context(self, context):
        from pathlib import Path

        from fdrl.eval.classifier import CONFIG_FILE, WEIGHTS_FILE, classifier_from_bytes

        a = context.artifacts  # keyed by file name
        self.model = classifier_from_bytes(Path(a[CONFIG_FILE]).read_bytes(),
                                           Path(a[WEIGHTS_FILE]).read_bytes())

    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.model(torch.as_tensor(np.asarray(model_input, np.float32))).numpy()


mlflow.models.set_model(ClassifierModel())
