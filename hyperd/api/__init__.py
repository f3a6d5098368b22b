"""hyperd's REST API: the Klein app (app.py), parameter parsing (params.py) and the site (site.py)."""
