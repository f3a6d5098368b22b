"""hyperd.guest."""
