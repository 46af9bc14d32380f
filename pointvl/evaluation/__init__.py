"""Score any model's outputs with the paper's metrics; predictors and the report."""
