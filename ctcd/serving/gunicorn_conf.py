"""gunicorn settings for ctcd's local model servers (host, port and workers come from argv).

The libraries a worker needs are imported here, in the master, so workers forked after a
SIGTTIN only load the model (about 0.4 s) instead of importing MLflow and scikit-learn.
"""

import fastapi  # noqa: F401
import mlflow.pyfunc.scoring_server  # noqa: F401
import pandas  # noqa: F401
import sklearn.ensemble
import sklearn.pipeline  # noqa: F401
import skops.io  # noqa: F401

worker_class = "uvicorn_worker.UvicornWorker"
control_socket_disable = True  # gunicorn 26 would otherwise write ~/.gunicorn
preload_app = False  # each worker reads current.json when it boots
graceful_timeout = 10
timeout = 120
keepalive = 5
errorlog = "-"
loglevel = "info"
