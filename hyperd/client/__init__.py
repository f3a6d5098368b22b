"""hyperd.client."""
