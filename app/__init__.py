"""The Streamlit app (`make app`): ask the deployed model for scores, see how it was evaluated."""
