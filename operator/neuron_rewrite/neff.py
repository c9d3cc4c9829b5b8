"""What a NeuronOp was compiled for, from its NEFF header and its attributes, without Neuron hardware or SDK.

A NeuronOp's ``executable`` attribute (AttrValue.s, field 2) is the NEFF, the Neuron Executable File Format. Its
first 1024 bytes are a header, documented by AWS in "Work with NEFF files"
(aws-neuron/aws-neuron-sdk ``neuron-runtime/explore/work-with-neff-files.rst``,
https://awsdocs-neuron.readthedocs-hosted.com/en/latest/neuron-runtime/explore/work-with-neff-files.html):
"The NEFF header is a 1024 byte buffer prepended onto the NEFF tarball". The page gives it as a C struct, names no
magic field and states no byte order; we read it at the struct's natural C alignment, little-endian, as AWS's own
parser does on the x86_64 hosts tensorflow-neuron runs on (see below: ``neff_util.py`` unpacks with Python's native
byte order and alignment). Offsets are computed from the struct; the descriptions are the page's::

    @0    u64       pkg_version          "Tool version used to create this NEFF"
    @8    u64       header_size          "Number of bytes contained in this header" (1024)
    @16   u64       data_size            "Size in bytes of the NEFF contents"
    @24   u64       neff_version_major
    @32   u64       neff_version_minor
    @40   char[128] neff_build_version   "Build version information"
    @168  u32       num_tpb              "Total number of TPBs required for efficient execution" (the pipeline size)
    @172  u8[32]    hash                 "sha256 or md5 depending on the pkg_version"
    @204  u8[16]    uuid
    @220  char[256] name
    @476  u32       requested_tpb_count
    @480  u8[64]    tpb_per_node
    @544  u64       feature_bits
    @552  u32       lnc_size             "Logical core size required to run this NEFF"
    @556  pad to 1024, then the tarball

AWS's own parser agrees on the fields it reads: aws-neuron/aws-neuron-tensorflow ``python/neff_util.py``
(commit 3fd686937a80) unpacks ``'168xI304xI64B'``, i.e. num_tpb @168 and tpb_per_node @480.

The header has no architecture field, so the NeuronCore generation is concluded only where a public source makes it
certain (see ``classify``); everything else is reported as unknown, with why. Reading only these 1024 bytes keeps
the scan streaming: an executable can be hundreds of MB.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

HEADER_SIZE = 1024

V1, V2, V3 = "NeuronCore-v1", "NeuronCore-v2", "NeuronCore-v3"
TARGETS = (V1, V2, V3)
_ANY = frozenset(TARGETS)

# The layout above, up to lnc_size (little-endian; no implicit padding, as every field already sits at its natural
# alignment).
_LAYOUT = struct.Struct("<QQQQQ128sI32s16s256sI64sQI")
assert _LAYOUT.size == 556, _LAYOUT.size

# Instance family (the instance type before its first dot) -> the NeuronCore generation of its chips: aws-neuron-sdk
# about-neuron/arch/neuron-hardware/ (inferentia.rst: "four NeuronCore-v1"; inferentia2.rst and trainium.rst:
# NeuronCore-v2; trainium2.rst: NeuronCore-v3).
FAMILY_TARGETS = {"inf1": V1, "inf2": V2, "trn1": V2, "trn1n": V2, "trn2": V3, "trn2u": V3}
# The families whose _instance_type tells a generation: those of tensorflow-neuron's --extract-weights choices, and
# trn1n (see _instance_evidence).
_EXTRACT_WEIGHTS_FAMILIES = ("inf1", "inf2", "trn1", "trn1n")


@dataclass(frozen=True)
class NeffHeader:
    """The fields of a NEFF header this tool reports or reasons from."""

    pkg_version: int
    data_size: int
    version_major: int
    version_minor: int
    build_version: str | None  # NUL-trimmed; None when empty or not printable text
    num_tpb: int
    requested_tpb_count: int
    max_tpb_per_node: int
    feature_bits: int
    lnc_size: int

    @property
    def version(self) -> str:
        return f"{self.version_major}.{self.version_minor}"


def parse_header(data: bytes) -> NeffHeader | None:
    """The header of a NEFF whose first bytes are ``data``; None when they are not one (fewer than 1024 bytes, or a
    ``header_size`` other than 1024: the layout names no magic field, so that is the only structural check there
    is)."""
    if len(data) < HEADER_SIZE:
        return None
    fields = _LAYOUT.unpack_from(data)
    pkg_version, header_size, data_size, major, minor, build, num_tpb = fields[:7]
    requested, per_node, feature_bits, lnc_size = fields[10:]
    if header_size != HEADER_SIZE:
        return None
    return NeffHeader(
        pkg_version=pkg_version,
        data_size=data_size,
        version_major=major,
        version_minor=minor,
        build_version=_text(build),
        num_tpb=num_tpb,
        requested_tpb_count=requested,
        max_tpb_per_node=max(per_node),
        feature_bits=feature_bits,
        lnc_size=lnc_size,
    )


def build_header(
    *,
    version: tuple[int, int],
    data_size: int,
    build_version: str | None = None,
    num_tpb: int = 1,
    lnc_size: int = 0,
    pkg_version: int = 1,
) -> bytes:
    """A 1024-byte NEFF header in the layout above, the fields not given zero: for test models shaped as the
    compilers write them, so the layout is written down once, here."""
    build = (build_version or "").encode("ascii")
    if len(build) >= 128:
        raise ValueError(f"neff_build_version of {len(build)} bytes does not fit its 128-byte field")
    fields = _LAYOUT.pack(
        pkg_version, HEADER_SIZE, data_size, *version, build, num_tpb, b"", b"", b"", 0, b"", 0, lnc_size
    )
    return fields.ljust(HEADER_SIZE, b"\0")


def _text(field: bytes) -> str | None:
    raw = field.split(b"\0", 1)[0]
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        return None
    return text if text and text.isprintable() else None


def not_a_neff(executable_bytes: int, data: bytes) -> str:
    """Why ``data`` (the first bytes of an executable of ``executable_bytes``) holds no NEFF header."""
    if executable_bytes == 0:
        return "no NEFF header (no executable)"
    if executable_bytes < HEADER_SIZE:
        return f"no NEFF header (executable of {executable_bytes} bytes, shorter than the 1024-byte header)"
    header_size = struct.unpack_from("<Q", data, 8)[0]
    return f"no NEFF header (header_size {header_size}, not 1024)"


class ContradictoryEvidence(ValueError):
    """Two pieces of evidence exclude each other: the op is damaged (or its attributes were edited by hand)."""

    def __init__(self, first: str, second: str) -> None:
        super().__init__(f"{first}, but {second}")
        self.first, self.second = first, second


@dataclass(frozen=True)
class Target:
    """``target`` is one of TARGETS, or None when it cannot be known; ``evidence`` says why, in words."""

    target: str | None
    evidence: str


def family(instance_type: str) -> str:
    return instance_type.split(".", 1)[0]


def _instance_evidence(instance_type: str) -> tuple[frozenset[str], str]:
    # tensorflow-neuron writes _instance_type only for --extract-weights <instance type> (aws-neuron-tensorflow
    # python/graph_def_util.py encode_extract_weights_info); python/_trace.py asserts inf1 instance types only with
    # neuron-cc and inf2/trn1 only with neuronx-cc, so the family names the NeuronCore generation. Matched by family,
    # not by a list of types: --extract-weights offers inf1.24xlarge (python/utils.py), while tensorflow-neuron's
    # own core counts (graph_def_util.py calculate_max_num_cores, runtime/direct/routine.cc) name the nonexistent
    # inf1.32xlarge; both are inf1.
    # trn1n is not among the --extract-weights choices; it is read by family all the same, as Trn1n has Trn1's
    # Trainium chips (about-neuron/arch/neuron-hardware/trn1-arch.rst, "Trn1/Trn1n"). trn2 (NeuronCore-v3) is no
    # type tensorflow-neuron knows, so says nothing.
    known = "." in instance_type and family(instance_type) in _EXTRACT_WEIGHTS_FAMILIES
    target = FAMILY_TARGETS[family(instance_type)] if known else None
    if target is not None:
        words = f"_instance_type {instance_type!r} is an instance of family {family(instance_type)} ({target})"
        return frozenset({target}), words
    return _ANY, f"_instance_type {instance_type!r} is no instance type tensorflow-neuron writes, so says nothing"


def _neff_evidence(header: NeffHeader) -> list[tuple[frozenset[str], str]]:
    pieces = []
    major, version = header.version_major, header.version
    if major == 0:
        # neuron-cc (Inf1) wrote NEFF 0.x ("NEFF version 0.6", aws-neuron-sdk
        # src/examples/tensorflow/keras_resnet50/keras_resnet50.ipynb) until "increase NEFF versions to 1.0"
        # (release-notes/archive/neuron-cc/neuron-cc.rst); neuronx-cc came later and never wrote 0.x.
        pieces.append((frozenset({V1}), f"NEFF {version} is only written by neuron-cc, for Inf1 ({V1})"))
    elif major == 1:
        # neuron-cc moved to 1.0 ("increase NEFF versions to 1.0", neuron-cc.rst); no public source says that no
        # other compiler writes 1.x, so it decides nothing.
        words = f"NEFF {version} is written by neuron-cc (Inf1), but no public source says only by it, so says nothing"
        pieces.append((_ANY, words))
    elif major == 2:
        # neuronx-cc writes 2.0 (aws-neuron-sdk issues #820, #823, #1061: "NEFF version: 2.0"), but not it alone as
        # far as any public source says: the runtime release notes' NEFF Support Table (aws-neuron-sdk
        # release-notes/runtime/aws-neuronx-runtime-lib/index.rst, e.g. at commit 1db4d74e) reads "2.0 >= 1.6.5.0
        # Starting support for 2.0 NEFFs", and runtime 1.6.5.0 is Neuron 1.14.1's (src/helperscripts/
        # neuron-releases-manifest.json), of the Inf1-only Neuron 1.x. So 2.0 NEFFs were loadable on Inf1 before
        # neuronx-cc existed, and major 2 decides nothing.
        pieces.append(
            (
                _ANY,
                f"NEFF {version} is written by neuronx-cc, but the Neuron runtime has loaded 2.0 NEFFs since 1.6.5.0 "
                '(Neuron 1.14.1, Inf1 only: "Starting support for 2.0 NEFFs"), so says nothing',
            )
        )
    else:
        pieces.append((_ANY, f"NEFF {version} is a version no public source maps to a compiler, so says nothing"))
    if header.lnc_size == 2:
        # Logical NeuronCores of 2 physical cores exist only from Trn2 on: "LNC applies only to Trn2 and Trn3
        # instances" (aws-neuron-sdk about-neuron/arch/neuron-features/logical-neuroncore-config.rst); "On trn1,
        # only lnc=1 is supported" (compiler/error-codes/EARG001.rst). Trn2 carries NeuronCore-v3.
        pieces.append((frozenset({V3}), f"NEFF lnc_size 2 exists only on Trn2 and later ({V3})"))
    return pieces


def classify(header: NeffHeader | None, instance_type: str | None, no_header: str = "no NEFF header") -> Target:
    """The NeuronCore generation one NeuronOp was compiled for, from its NEFF header (None: the executable holds
    none, as ``no_header`` says) and its ``_instance_type`` attribute (None: absent).

    Each piece of evidence narrows a set of possible generations; the sets are intersected. Decisive are only:
    ``_instance_type`` inf1.* (v1), inf2.*/trn1.*/trn1n.* (v2); NEFF major 0 (v1); NEFF lnc_size 2 (v3). So
    NeuronCore-v2 is known only from ``_instance_type``. NEFF major 1 and 2 (see ``_neff_evidence``), lnc_size 0 or
    1 and a missing header decide nothing. Raises ContradictoryEvidence when two pieces exclude each other.
    """
    pieces: list[tuple[frozenset[str], str]] = []
    if instance_type is not None:
        pieces.append(_instance_evidence(instance_type))
    if header is None:
        pieces.append((_ANY, no_header))
    else:
        pieces += _neff_evidence(header)
    possible = _ANY
    for i, (allowed, words) in enumerate(pieces):
        if not possible & allowed:
            # The earlier piece that excludes this one, else the last that narrowed anything.
            disjoint = [w for s, w in pieces[:i] if not s & allowed]
            earlier = disjoint[0] if disjoint else next(w for s, w in reversed(pieces[:i]) if s != _ANY)
            raise ContradictoryEvidence(earlier, words)
        possible &= allowed
    evidence = "; ".join(words for _, words in pieces)
    if len(possible) == 1:
        return Target(next(iter(possible)), evidence)
    return Target(None, evidence)


def classify_op(executable_bytes: int, head: bytes, instance_type: str | None) -> tuple[Target, str | None]:
    """``classify`` from what a scan reads of one NeuronOp: the size of its executable and its first bytes (at
    least HEADER_SIZE of them when there are that many), and its ``_instance_type``; with the NEFF's build version,
    the compiler's, when the header records one."""
    header = parse_header(head)
    if header is None:
        return classify(None, instance_type, not_a_neff(executable_bytes, head)), None
    return classify(header, instance_type), header.build_version


@dataclass(frozen=True)
class ModelTarget:
    """The target of a set of NeuronOps loaded together; ``conflict`` names two that disagree (a refusal)."""

    target: str | None
    evidence: str
    compiler: str | None
    conflict: str | None = None


@dataclass(frozen=True)
class OpTarget:
    """What ``combine`` needs of one NeuronOp (or of one model version): where it is, in words, and its target."""

    where: str
    target: str | None
    evidence: str
    compiler: str | None


def join_compilers(compilers: Iterable[str | None]) -> str | None:
    """The one build string when the known ones agree, else all of them joined with ", " (sorted); None when none
    is known."""
    known = sorted({c for c in compilers if c is not None})
    return ", ".join(known) if known else None


def combine(ops: Sequence[OpTarget], kind: str = "NeuronOp") -> ModelTarget:
    """The target of ``ops``, each a ``kind`` (NeuronOps the Neuron runtime loads on the same NeuronCores, or the
    versions of a base path): the one known target, when the known ones agree (those of unknown target do not change
    it, the evidence counts them); None with a ``conflict`` when two known targets differ."""
    compiler = join_compilers(op.compiler for op in ops)
    if not ops:
        return ModelTarget(None, f"no {kind}", compiler)
    known = [op for op in ops if op.target is not None]
    unknown = [op for op in ops if op.target is None]
    for op in known[1:]:
        if op.target != known[0].target:
            first = known[0]
            conflict = (
                f"{kind} {first.where} was compiled for {first.target} ({first.evidence}) but {kind} {op.where} "
                f"for {op.target} ({op.evidence})"
            )
            return ModelTarget(None, f"mixed targets: {conflict}", compiler, conflict)
    if not known:
        reasons = sorted({op.evidence for op in ops})
        return ModelTarget(None, f"unknown for all {len(ops)} {kind}(s): " + "; ".join(reasons), compiler)
    reasons = sorted({op.evidence for op in known})
    evidence = f"{len(known)} of {len(ops)} {kind}(s): " + " | ".join(reasons)
    if unknown:
        evidence += f"; {len(unknown)} unknown ({unknown[0].evidence})"
    return ModelTarget(known[0].target, evidence, compiler)
