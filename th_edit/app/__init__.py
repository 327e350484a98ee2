"""The application: the th-edit command line, the demo pipeline, its Markdown report and PNG figures."""
