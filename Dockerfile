# One image for both components: `bilayer operator` and `bilayer dataplane`.
# Stage 1 builds wheels (compilers live here only: mypyc compiles the request path, see
# setup.py); stage 2 installs them on a slim base.
FROM python:3.11-slim-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py compiled-modules.txt README.md ./
COPY operator ./operator
COPY dataplane ./dataplane
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
# Non-root; the Helm chart also makes the root filesystem read-only and drops every capability.
RUN groupadd --system --gid 10001 bilayer \
 && useradd --system --uid 10001 --gid bilayer --no-create-home --shell /usr/sbin/nologin bilayer
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-compile /wheels/*.whl \
 && rm -rf /wheels \
 && python -m compileall -q /usr/local/lib/python3.11/site-packages
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
USER 10001:10001
ENTRYPOINT ["bilayer"]
CMD ["--help"]
