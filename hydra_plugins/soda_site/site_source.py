"""Serves the site profile (launching/site.py) to Hydra from the front of the config search path:
`site/default`, the profile with its launcher settings moved to `hydra/launcher/site`.

The source reads the profile when it is created and keeps what it read, so a SLURM job, which
gets the submitting process's config loader (and this source in it), composes the profile as it
was checked at submission, even if the file has changed since. With no profile in force it serves
nothing, except that `SODA_SITE=none` hides conf/site/default.yaml (an empty `site/default`).
"""

import os
from typing import Any

from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.object_type import ObjectType
from hydra.plugins.config_source import ConfigLoadError, ConfigResult, ConfigSource
from hydra.plugins.search_path_plugin import SearchPathPlugin
from omegaconf import OmegaConf

SCHEME = "sodasite"
PROVIDER = "soda-site"
_SITE = "site/default"
_LAUNCHER = "hydra/launcher/site"


class SiteSearchPath(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        from launching import site

        path = site.profile_path()
        if path is not None:
            search_path.prepend(provider=PROVIDER, path=f"{SCHEME}://{path}")
        elif site.ENV in os.environ:  # SODA_SITE=none: hide conf/site/default.yaml
            search_path.prepend(provider=PROVIDER, path=f"{SCHEME}://none")


class SiteConfigSource(ConfigSource):
    def __init__(self, provider: str, path: str) -> None:
        super().__init__(provider=provider, path=path)
        self._configs: dict[str, Any] | None = None
        self._error: str | None = None

    @staticmethod
    def scheme() -> str:
        return SCHEME

    def _read(self) -> dict[str, Any]:
        """{config path: (values, package)} of what this source serves; read once."""
        if self._configs is None:
            from pathlib import Path

            from launching import site
            from soda.errors import ConfigError

            self._configs = {}
            if self.path == "none":
                self._configs[_SITE] = ({}, "_global_")
            else:
                try:
                    profile = site.read_profile(Path(self.path))
                except ConfigError as error:
                    self._error = str(error)
                    self._configs[_SITE] = ({}, "_global_")  # load_config raises the error
                    return self._configs
                self._configs[_SITE] = (profile.site_config(), profile.package or "_global_")
                if profile.serves_a_launcher:
                    self._configs[_LAUNCHER] = (profile.launcher_config(), None)
        return self._configs

    def load_config(self, config_path: str) -> ConfigResult:
        configs = self._read()
        if self._error is not None:
            raise ConfigLoadError(self._error)
        name = self._normalize_file_name(config_path)[: -len(".yaml")]
        if name not in configs:
            raise ConfigLoadError(f"Config not found: {config_path} (in {SCHEME}://{self.path})")
        values, package = configs[name]
        header = {"package": package}  # None: the default, the group's package
        return ConfigResult(
            config=OmegaConf.create(values), path=f"{SCHEME}://{self.path}", provider=self.provider, header=header
        )

    def available(self) -> bool:
        return True

    def is_group(self, config_path: str) -> bool:
        groups = {""}
        for name in self._read():
            parts = name.split("/")[:-1]
            groups.update("/".join(parts[:n]) for n in range(1, len(parts) + 1))
        return config_path.strip("/") in groups

    def is_config(self, config_path: str) -> bool:
        name = config_path.strip("/")
        return (name[: -len(".yaml")] if name.endswith(".yaml") else name) in self._read()

    def list(self, config_path: str, results_filter: ObjectType | None) -> list[str]:
        prefix = config_path.strip("/")
        found = set()
        for name in self._read():
            parent, _, leaf = name.rpartition("/")
            if parent == prefix and results_filter in (None, ObjectType.CONFIG):
                found.add(leaf)
            elif name.startswith(f"{prefix}/" if prefix else "") and results_filter in (None, ObjectType.GROUP):
                rest = name[len(prefix) + 1 :] if prefix else name
                if "/" in rest:
                    found.add(rest.split("/", 1)[0])
        return sorted(found)
