"""The site profile as Hydra configs: `site/default` and `hydra/launcher=site` (soda/site.py)."""
