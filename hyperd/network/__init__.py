"""hyperd.network."""
