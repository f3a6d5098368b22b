"""hyperd.api."""
