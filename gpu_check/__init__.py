"""gpu-check: the one-command GPU verification run (see gpu_check/__main__.py and `make gpu-check`)."""
