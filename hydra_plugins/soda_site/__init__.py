"""The site profile as Hydra configs: `site/default` and `hydra/launcher=site` (launching/site.py)."""
