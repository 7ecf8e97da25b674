"""The plugin's config: RecBole's ``Config`` with the plugin's yaml files (``configurator``), what each key accepts
(``schema``, ``choices``), the MPO stage grammar (``stages``) and a run's replayable values (``snapshot``)."""

from recbole_speeder.config.configurator import Config

__all__ = ["Config"]
