"""Tasks and evaluation: Laundry List / IOI datasets, batching, accuracy with intervals, the guard text."""
