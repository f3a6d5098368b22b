"""hyperd.vm."""
