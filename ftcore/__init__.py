"""ft's core library: typed config, streaming data, model loading, the training recipe, checkpoints, export."""

from ftcore.quiet import install_filters

install_filters()
