"""After a study: the champion. `promote` scores the best healthy trial on the test split once and registers it;
`model` is the champion as an MLflow Model; `inference` classifies files with a checkpoint; `predict` is `octft
predict`."""
