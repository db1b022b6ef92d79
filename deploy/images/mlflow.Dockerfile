# The MLflow tracking server's image: the MLflow the lock pins (a server older than its clients can refuse their
# requests; tests/test_deploy.py keeps this pin equal to uv.lock's), the PostgreSQL driver for its backend store
# and the Cloud Storage client for the artifacts it serves. Build it from this folder:
#   docker build -f deploy/images/mlflow.Dockerfile -t REGION-docker.pkg.dev/PROJECT/octft/mlflow:3.17.2 deploy/images
FROM python:3.11-slim-bookworm

RUN pip install --no-cache-dir "mlflow==3.17.2" "psycopg2-binary>=2.9" "google-cloud-storage>=2.18"

EXPOSE 5000
ENTRYPOINT ["mlflow", "server"]
