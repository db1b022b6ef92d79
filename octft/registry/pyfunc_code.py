"""The champion's code, as MLflow loads it: this file is the Model's `python_model` (models from code).

`mlflow.pyfunc.load_model` and `mlflow models serve` run it with the model's own copy of the octft package (its
`code/` folder) first on `sys.path`, so the model loads where octft is not installed, and nothing is unpickled
(`MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false` holds). `octft.registry.model` writes the Model.
"""

from octft.registry.model import OctVolumeClassifier
from octft.track.mlflow_store import set_model

set_model(OctVolumeClassifier())
