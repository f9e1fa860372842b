"""One run of the loop: the run object, its loop, metric windows and host timing."""
