"""hyperd.image."""
