#!/usr/bin/env bash
# Idempotent, cached download/build of what the Flink smoke tests need:
#   * a Beam Flink job-server jar (shaded "uber" jar, main class
#     org.apache.beam.runners.flink.FlinkJobServerDriver), built locally with
#     Maven from org.apache.beam:beam-runners-flink-<FLINK_MINOR>:<BEAM_JAVA_VERSION>
#     because the ready-made beam-runners-flink-*-job-server jars are not served
#     by the package registry reachable here (see docs/runners_notes.md);
#   * a Flink distribution (lib/flink-dist-*.jar, log4j jars, bin/bash-java-utils.jar)
#     taken from the `apache-flink-libraries` PyPI sdist (flink-dist is not on
#     Maven Central).
# Everything lands in <repo>/.cache/flink/. Re-running does no work when the
# artefacts are already there. Exits non-zero with a clear message on failure.
#
# Env overrides: BEAM_JAVA_VERSION (2.62.0), FLINK_MINOR (1.19),
#                FLINK_VERSION (1.19.3), PYTHON (python for `pip download`).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CACHE="${FLINK_CACHE_DIR:-$ROOT/.cache/flink}"
BEAM_JAVA_VERSION="${BEAM_JAVA_VERSION:-2.62.0}"
FLINK_MINOR="${FLINK_MINOR:-1.19}"
FLINK_VERSION="${FLINK_VERSION:-1.19.3}"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi

JAR="$CACHE/beam-runners-flink-${FLINK_MINOR}-job-server-${BEAM_JAVA_VERSION}.jar"
FLINK_HOME="$CACHE/flink-${FLINK_VERSION}"

die() { echo "fetch.sh: ERROR: $*" >&2; exit 1; }
log() { echo "fetch.sh: $*" >&2; }

mkdir -p "$CACHE"
command -v java >/dev/null || die "java not found (need Java 11/17 on PATH)"

# ---------------------------------------------------------------- job server
build_job_server() {
  command -v mvn >/dev/null || die "mvn not found (apt-get install maven)"
  local b="$CACHE/jobserver-build"
  mkdir -p "$b"
  cat > "$b/pom.xml" <<POM
<?xml version="1.0" encoding="UTF-8"?>
<project xmlns="http://maven.apache.org/POM/4.0.0"
         xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
         xsi:schemaLocation="http://maven.apache.org/POM/4.0.0 http://maven.apache.org/xsd/maven-4.0.0.xsd">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.beam-influence</groupId>
  <artifactId>beam-flink-job-server</artifactId>
  <version>${BEAM_JAVA_VERSION}</version>
  <packaging>jar</packaging>
  <properties>
    <project.build.sourceEncoding>UTF-8</project.build.sourceEncoding>
  </properties>
  <dependencies>
    <dependency>
      <groupId>org.apache.beam</groupId>
      <artifactId>beam-runners-flink-${FLINK_MINOR}</artifactId>
      <version>${BEAM_JAVA_VERSION}</version>
    </dependency>
    <dependency>
      <groupId>org.slf4j</groupId>
      <artifactId>slf4j-simple</artifactId>
      <version>1.7.36</version>
      <scope>runtime</scope>
    </dependency>
  </dependencies>
  <build>
    <plugins>
      <plugin>
        <groupId>org.apache.maven.plugins</groupId>
        <artifactId>maven-shade-plugin</artifactId>
        <version>3.6.0</version>
        <executions>
          <execution>
            <phase>package</phase>
            <goals><goal>shade</goal></goals>
            <configuration>
              <createDependencyReducedPom>false</createDependencyReducedPom>
              <filters>
                <filter>
                  <artifact>*:*</artifact>
                  <excludes>
                    <exclude>META-INF/*.SF</exclude>
                    <exclude>META-INF/*.DSA</exclude>
                    <exclude>META-INF/*.RSA</exclude>
                    <exclude>module-info.class</exclude>
                  </excludes>
                </filter>
              </filters>
              <transformers>
                <transformer implementation="org.apache.maven.plugins.shade.resource.ServicesResourceTransformer"/>
                <transformer implementation="org.apache.maven.plugins.shade.resource.AppendingTransformer">
                  <resource>reference.conf</resource>
                </transformer>
                <transformer implementation="org.apache.maven.plugins.shade.resource.ManifestResourceTransformer">
                  <mainClass>org.apache.beam.runners.flink.FlinkJobServerDriver</mainClass>
                </transformer>
              </transformers>
            </configuration>
          </execution>
        </executions>
      </plugin>
    </plugins>
  </build>
</project>
POM
  log "building Beam Flink job server (beam-runners-flink-${FLINK_MINOR}:${BEAM_JAVA_VERSION}) with Maven; first run downloads ~250 MB of jars"
  if ! mvn -B -q -f "$b/pom.xml" package > "$b/mvn.log" 2>&1; then
    tail -40 "$b/mvn.log" >&2
    die "Maven build of the job server failed (full log: $b/mvn.log)"
  fi
  local out="$b/target/beam-flink-job-server-${BEAM_JAVA_VERSION}.jar"
  [[ -s "$out" ]] || die "Maven finished but $out is missing"
  cp "$out" "$JAR.tmp" && mv "$JAR.tmp" "$JAR"
  rm -rf "$b/target"
}

if [[ -s "$JAR" ]]; then
  log "job server jar cached: $JAR"
else
  build_job_server
  log "job server jar built: $JAR"
fi

# ------------------------------------------------------- Flink distribution
fetch_flink() {
  local dl="$CACHE/dl"
  local sdist="$dl/apache-flink-libraries-${FLINK_VERSION}.tar.gz"
  mkdir -p "$dl"
  if [[ ! -s "$sdist" ]]; then
    log "downloading apache-flink-libraries==${FLINK_VERSION} from PyPI (~230 MB; pip prepares the sdist metadata, which takes a few minutes)"
    "$PYTHON" -m pip download --no-deps --no-binary :all: \
        "apache-flink-libraries==${FLINK_VERSION}" -d "$dl" >&2 \
      || die "pip download apache-flink-libraries==${FLINK_VERSION} failed"
  fi
  [[ -s "$sdist" ]] || die "$sdist missing after pip download"
  local tmp="$FLINK_HOME.tmp"
  rm -rf "$tmp"; mkdir -p "$tmp"
  tar -xzf "$sdist" -C "$tmp" --strip-components=2 \
      "apache-flink-libraries-${FLINK_VERSION}/deps/lib" \
      "apache-flink-libraries-${FLINK_VERSION}/deps/bin" \
    || die "could not extract lib/ and bin/ from $sdist"
  [[ -s "$tmp/lib/flink-dist-${FLINK_VERSION}.jar" ]] || die "flink-dist jar missing in $sdist"
  echo "${FLINK_VERSION}" > "$tmp/VERSION"
  rm -rf "$FLINK_HOME"; mv "$tmp" "$FLINK_HOME"
  rm -f "$sdist"  # 230 MB; the extracted $FLINK_HOME is the cache from now on
}

if [[ -s "$FLINK_HOME/lib/flink-dist-${FLINK_VERSION}.jar" && -s "$FLINK_HOME/bin/bash-java-utils.jar" ]]; then
  log "Flink distribution cached: $FLINK_HOME"
else
  fetch_flink
  log "Flink distribution ready: $FLINK_HOME"
fi

# Record what we have for tools/flink/cluster.py.
cat > "$CACHE/artifacts.env" <<ENV
BEAM_JAVA_VERSION=${BEAM_JAVA_VERSION}
FLINK_MINOR=${FLINK_MINOR}
FLINK_VERSION=${FLINK_VERSION}
FLINK_JOB_SERVER_JAR=${JAR}
FLINK_HOME=${FLINK_HOME}
ENV

echo "Flink artefacts in $CACHE:"
printf '  %-22s %s (%s)\n' "job server jar" "$JAR" "$(du -h "$JAR" | cut -f1)"
printf '  %-22s %s\n' "Flink distribution" "$FLINK_HOME ($(ls "$FLINK_HOME/lib" | wc -l) jars in lib/)"
printf '  %-22s %s\n' "versions" "Beam Java ${BEAM_JAVA_VERSION}, Flink ${FLINK_VERSION}"
