"""hyperd.agent."""
