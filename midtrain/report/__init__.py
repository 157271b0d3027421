"""Reports: plots and markdown summaries of training runs (``midtrain report``)."""
