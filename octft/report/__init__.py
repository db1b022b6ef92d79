"""Looking at a study: `study` renders its self-contained HTML report (`octft report`), `ui` serves MLflow's own UI
on its store (`octft ui`). Both read the stores and never train."""
