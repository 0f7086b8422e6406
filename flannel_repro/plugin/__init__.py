"""The pytest plugin (entry point `flannel_repro.plugin.hooks`).

- `hooks`: the hooks and fixtures, each handing off to the session;
- `session`: options, ini keys and the config file resolved into one `FlannelSession`;
- `report`: progress lines while runs train, and the terminal summary;
- `snapshot`: the syrupy extension for run summaries.
"""
