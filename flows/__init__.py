"""ctcd's Prefect flows and their tasks."""
