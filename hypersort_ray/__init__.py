"""hypersort-ray: HyperSORT (MICCAI 2025) as a Ray-distributed experiment service."""

import os as _os

__version__ = "0.1.0"

# Privacy by default: nothing leaves the machine unless the user opts in. Ray's usage statistics and
# MLflow's telemetry are both on by default upstream; a value the user set in the environment wins.
# Set before Ray or MLflow is imported by any of our modules (both read these at start-up).
_os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
_os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
