"""One run: the round driver, the transport contract, the experiment, state, metrics, artifact, report."""
