# millstream worker image: multi-stage, slim, non-root, read-only-root-filesystem friendly.
#   docker build -t millstream .
#   docker run --rm millstream settings --doc
FROM python:3.11-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# A compiler for any dependency without a wheel for this platform (build stage only).
RUN apt-get update && apt-get install -y --no-install-recommends build-essential && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY app ./app
COPY agents ./agents
COPY models ./models
COPY sinks ./sinks
RUN python -m venv /opt/millstream && /opt/millstream/bin/pip install '.[msk]'

FROM python:3.11-slim-bookworm
ENV PATH=/opt/millstream/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    MILLSTREAM_DATA_DIR=/var/lib/millstream
RUN groupadd --system --gid 10001 millstream \
 && useradd --system --uid 10001 --gid millstream --home-dir /var/lib/millstream millstream \
 && mkdir -p /var/lib/millstream && chown millstream:millstream /var/lib/millstream
COPY --from=build /opt/millstream /opt/millstream
USER 10001:10001
WORKDIR /var/lib/millstream
VOLUME ["/var/lib/millstream"]
EXPOSE 6066
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:6066/healthz', timeout=4)"
ENTRYPOINT ["millstream"]
CMD ["worker"]
