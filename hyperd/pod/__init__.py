"""hyperd.pod."""
