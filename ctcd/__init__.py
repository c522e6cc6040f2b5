"""ctcd: continuous training and continuous deployment of ML models with Prefect and MLflow."""
