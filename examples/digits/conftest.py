"""The example's engine is registered when pytest loads this file (and in the fresh processes of
`resume_at`, which import `digits_engine` by name)."""

import digits_engine  # noqa: F401
