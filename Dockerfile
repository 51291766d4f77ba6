# Production image: gunicorn serving service.app:create_app(), non-root, config from CDS_* environment.
FROM python:3.11-slim AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first, from the same pinned constraints every install path uses.
COPY pyproject.toml constraints.txt README.md ./
COPY cds_hooks ./cds_hooks
COPY service ./service
COPY gunicorn.conf.py ./
RUN pip install -c constraints.txt . \
    && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin cds \
    && mkdir -p /app/var && chown cds /app/var

USER cds

# Authentication is on by default: the deployment must provide CDS_PUBLIC_BASE_URL and a trusted-issuers
# file (mount it, e.g. -v ./issuers.json:/config/issuers.json:ro). CDS_DATABASE_URL should point at
# PostgreSQL when running more than one replica.
ENV CDS_AUTH=required \
    CDS_BIND=0.0.0.0:8080 \
    CDS_WORKERS=2 \
    CDS_DATABASE_URL=sqlite:////app/var/feedback.sqlite3 \
    CDS_TRUSTED_ISSUERS_FILE=/config/issuers.json

EXPOSE 8080

# On the port CDS_BIND names: with a hard-coded 8080, a container given another CDS_BIND was never healthy.
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s --retries=3 \
    CMD python -c "import os,sys,urllib.request; port = os.environ.get('CDS_BIND', '').rpartition(':')[2] or '8080'; sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=2).status == 200 else 1)"

CMD ["gunicorn", "-c", "gunicorn.conf.py", "service.app:create_app()"]
