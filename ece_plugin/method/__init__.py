"""The ECE method itself (Zhang et al., WWW 2025): the paper's stages, the sequential state, the statistics and the
masked update. Nothing here imports from the EasyEdit bridge (``ece_plugin.easyedit``), the files layer, the
evaluation or the lab."""
