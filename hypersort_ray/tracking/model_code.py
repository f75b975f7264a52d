"""MLflow "models from code" entry point of the hypersort pyfunc model.

MLflow copies this file into every logged model and executes it when the model is loaded; the
``hypersort_ray`` package it imports travels with the model as ``code_paths``. Keeping the class in
:mod:`hypersort_ray.tracking.pyfunc` and only instantiating it here means no Python object is ever
pickled (see that module's docstring).
"""

import mlflow

from hypersort_ray.tracking.pyfunc import HyperSortPyfunc

mlflow.models.set_model(HyperSortPyfunc())
