"""One module per ``spirs`` sub-command (see :mod:`spirs_tf.cli`)."""
