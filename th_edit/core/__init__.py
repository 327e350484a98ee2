"""The maths core and the model table: factored linear algebra (tensors in, tensors out), the
``config.model_type`` architecture table, per-head weight views of a live model, and its circuits."""
