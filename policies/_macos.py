"""macOS identity through ``ctypes``: libproc and Security.framework.

Everything here is keyed by the sender's audit token, never by a bare pid:
``proc_pidpath_audittoken`` fails with ESRCH once the pid belongs to another
process (or the same process after an exec, since pidversion changes then),
and ``SecCodeCopyGuestWithAttributes`` with ``kSecGuestAttributeAudit`` gives
the code object of exactly the process that sent the message.

Only importable on macOS (the libraries are loaded on first use). Nothing in
this module can be exercised on Linux; the callers map every failure to a
denial with a reason.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct
from typing import Optional, Sequence

__all__ = [
    "FrameworkUnavailable",
    "SecError",
    "image_for_token",
    "path_for_token",
    "pidversion_alive",
    "signing_info_for_token",
    "check_token",
    "self_signing_info",
    "self_designated_requirement",
    "OSSTATUS_TEXT",
]

_AUDIT = struct.Struct("8I")
_PATH_MAX = 4096  # PROC_PIDPATHINFO_MAXSIZE

kCFStringEncodingUTF8 = 0x08000100
kSecCSDefaultFlags = 0
kSecCSSigningInformation = 1 << 1

#: OSStatus values a check can end in, as a person would want to read them.
errSecCSUnsigned = -67062
errSecCSReqFailed = -67050
errSecCSNoSuchCode = -67065
errSecCSGuestInvalid = -67063
errSecCSStaticCodeChanged = -67034
errSecCSSignatureFailed = -67061
errSecCSReqInvalid = -67052
OSSTATUS_TEXT = {
    errSecCSUnsigned: "the code is not signed",
    errSecCSReqFailed: "the code does not satisfy the requirement",
    errSecCSNoSuchCode: "the process is gone (no such code)",
    errSecCSGuestInvalid: "the process's code is no longer valid",
    errSecCSStaticCodeChanged: "the code on disk changed since the process started",
    errSecCSSignatureFailed: "the code signature is invalid",
    errSecCSReqInvalid: "the requirement text is invalid",
}

_libc = None
_cf = None
_sec = None


class FrameworkUnavailable(OSError):
    """CoreFoundation / Security.framework cannot be loaded (or lacks a symbol):
    the only failure after which a caller may fall back to another check."""


class SecError(OSError):
    """A Security.framework call failed with ``status`` (an OSStatus): deny, never fall back."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(errno.EINVAL, text)
        self.status = status


class AuditToken(ctypes.Structure):
    _fields_ = [("val", ctypes.c_uint32 * 8)]


# <sys/proc_info.h>; tools/macos_check.py asserts these layouts against the SDK.
PROC_PIDREGIONPATHINFO = 8
VM_PROT_EXECUTE = 0x4
MAXPATHLEN = 1024


class ProcRegionInfo(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint32) for n in ("pri_protection", "pri_max_protection", "pri_inheritance",
                                                "pri_flags")] + [("pri_offset", ctypes.c_uint64)] + [
        (n, ctypes.c_uint32) for n in ("pri_behavior", "pri_user_wired_count", "pri_user_tag", "pri_pages_resident",
                                       "pri_pages_shared_now_private", "pri_pages_swapped_out", "pri_pages_dirtied",
                                       "pri_ref_count", "pri_shadow_depth", "pri_share_mode",
                                       "pri_private_pages_resident", "pri_shared_pages_resident", "pri_obj_id",
                                       "pri_depth")] + [("pri_address", ctypes.c_uint64), ("pri_size", ctypes.c_uint64)]


class VinfoStat(ctypes.Structure):
    _fields_ = [("vst_dev", ctypes.c_uint32), ("vst_mode", ctypes.c_uint16), ("vst_nlink", ctypes.c_uint16),
                ("vst_ino", ctypes.c_uint64), ("vst_uid", ctypes.c_uint32), ("vst_gid", ctypes.c_uint32)] + [
        (n, ctypes.c_int64) for n in ("vst_atime", "vst_atimensec", "vst_mtime", "vst_mtimensec", "vst_ctime",
                                      "vst_ctimensec", "vst_birthtime", "vst_birthtimensec", "vst_size",
                                      "vst_blocks")] + [
        ("vst_blksize", ctypes.c_int32), ("vst_flags", ctypes.c_uint32), ("vst_gen", ctypes.c_uint32),
        ("vst_rdev", ctypes.c_uint32), ("vst_qspare", ctypes.c_int64 * 2)]


class VnodeInfoPath(ctypes.Structure):
    _fields_ = [("vi_stat", VinfoStat), ("vi_type", ctypes.c_int), ("vi_pad", ctypes.c_int),
                ("vi_fsid", ctypes.c_int32 * 2), ("vip_path", ctypes.c_char * MAXPATHLEN)]


class ProcRegionWithPathInfo(ctypes.Structure):
    _fields_ = [("prp_prinfo", ProcRegionInfo), ("prp_vip", VnodeInfoPath)]


def _token(words: Sequence[int]) -> AuditToken:
    t = AuditToken()
    for i, w in enumerate(words):
        t.val[i] = w & 0xFFFFFFFF
    return t


#: libproc functions called through ctypes: name -> (restype, argtypes). tools/macos_check.py
#: compiles these signatures against <libproc.h> (an incompatible one fails the gate).
LIBPROC_SIGNATURES = {
    "proc_pidpath_audittoken": (ctypes.c_int, [ctypes.POINTER(AuditToken), ctypes.c_void_p, ctypes.c_uint32]),
    "proc_pidinfo": (ctypes.c_int, [ctypes.c_int, ctypes.c_int, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_int]),
}


def _load_libc():
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "/usr/lib/libSystem.B.dylib", use_errno=True)
        for name, (restype, argtypes) in LIBPROC_SIGNATURES.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes
        _libc = lib
    return _libc


def path_for_token(words: Sequence[int]) -> str:
    """The executable path of the process named by the audit token.

    Raises ProcessLookupError when that process (pid + pidversion) is gone.
    """
    lib = _load_libc()
    buf = ctypes.create_string_buffer(_PATH_MAX)
    n = lib.proc_pidpath_audittoken(ctypes.byref(_token(words)), buf, _PATH_MAX)
    if n <= 0:
        err = ctypes.get_errno() or errno.ESRCH
        if err == errno.ESRCH:
            raise ProcessLookupError(err, "no such process (pid reused or exited)")
        raise OSError(err, os.strerror(err))
    return os.fsdecode(buf.raw[:n])


def pidversion_alive(pid: int, pidversion: int) -> bool:
    """True while ``pid`` still has this ``pidversion`` (same process, same exec).

    Only ESRCH means gone: libproc's proc_pidpath_audittoken checks the
    pidversion first (ESRCH on a mismatch, libsyscall/wrappers/libproc/libproc.c)
    and only then builds the path (proc_pidpathinfo_internal, xnu
    bsd/kern/proc_info.c), which fails with ENOENT/EACCES for a live process
    whose binary was deleted or lies where this process cannot look.
    """
    words = [0] * 8
    words[5], words[7] = pid, pidversion
    try:
        path_for_token(words)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def image_for_token(words: Sequence[int], max_regions: int = 65536) -> tuple[str, tuple[int, int]]:
    """``(path, (st_dev, st_ino))`` of the file the token's process *runs*.

    The path alone (proc_pidpath_audittoken) is a name built from the text
    vnode, and whatever that name points to a moment later may be another file.
    So the running image is also found in the process's VM map: the executable
    region mapped from a file of that very path (PROC_PIDREGIONPATHINFO walks
    the map entries in address order, fill_procregioninfo in xnu
    bsd/kern/proc_info.c), whose vnode's (dev, ino) is the image's own. The
    token is checked again afterwards, since proc_pidinfo takes a bare pid.
    Raises ProcessLookupError when the process is gone, OSError when the image
    cannot be found (then identity is unknown, never guessed).
    """
    path = path_for_token(words)
    lib = _load_libc()
    info = ProcRegionWithPathInfo()
    address, pid, raw = 0, words[5], os.fsencode(path)
    for _ in range(max_regions):
        n = lib.proc_pidinfo(pid, PROC_PIDREGIONPATHINFO, address, ctypes.byref(info), ctypes.sizeof(info))
        if n < ctypes.sizeof(info):
            break
        region, vip = info.prp_prinfo, info.prp_vip
        if region.pri_protection & VM_PROT_EXECUTE and vip.vip_path == raw:
            if not pidversion_alive(pid, words[7]):
                raise ProcessLookupError(errno.ESRCH, "no such process (pid reused or exited)")
            dev = vip.vi_stat.vst_dev
            return path, (dev - (1 << 32) if dev >= 1 << 31 else dev, vip.vi_stat.vst_ino)  # st_dev is a signed dev_t
        if region.pri_size == 0:
            break
        address = region.pri_address + region.pri_size
    raise OSError(errno.ENOENT, f"no executable mapping of {path} in the process: the image cannot be identified")


# -- CoreFoundation / Security.framework ------------------------------------


def _load_security():
    global _cf, _sec
    if _sec is None:
        try:
            _cf, _sec = _bind_security()
        except (OSError, AttributeError) as exc:
            raise FrameworkUnavailable(errno.ENOENT, f"Security.framework unusable: {exc}") from None
    return _cf, _sec


def _bind_security():
    cf = ctypes.CDLL("/System/Library/Frameworks/CoreFoundation.framework/CoreFoundation")
    sec = ctypes.CDLL("/System/Library/Frameworks/Security.framework/Security")
    vp, u32, osstatus = ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int32
    for name, res, args in [
        ("CFRelease", None, [vp]),
        ("CFDataCreate", vp, [vp, ctypes.c_char_p, ctypes.c_long]),
        ("CFDataGetLength", ctypes.c_long, [vp]),
        ("CFDataGetBytePtr", vp, [vp]),
        ("CFStringCreateWithCString", vp, [vp, ctypes.c_char_p, u32]),
        ("CFStringGetCString", ctypes.c_bool, [vp, ctypes.c_char_p, ctypes.c_long, u32]),
        ("CFDictionaryCreate", vp, [vp, ctypes.POINTER(vp), ctypes.POINTER(vp), ctypes.c_long, vp, vp]),
        ("CFDictionaryGetValue", vp, [vp, vp]),
        ("CFGetTypeID", ctypes.c_ulong, [vp]),
        ("CFStringGetTypeID", ctypes.c_ulong, []),
        ("CFDataGetTypeID", ctypes.c_ulong, []),
    ]:
        fn = getattr(cf, name)
        fn.restype, fn.argtypes = res, args
    for name, args in [
        ("SecCodeCopyGuestWithAttributes", [vp, vp, u32, ctypes.POINTER(vp)]),
        ("SecCodeCopySelf", [u32, ctypes.POINTER(vp)]),
        ("SecRequirementCreateWithString", [vp, u32, ctypes.POINTER(vp)]),
        ("SecCodeCheckValidity", [vp, u32, vp]),
        ("SecCodeCopySigningInformation", [vp, u32, ctypes.POINTER(vp)]),
        ("SecCodeCopyDesignatedRequirement", [vp, u32, ctypes.POINTER(vp)]),
        ("SecRequirementCopyString", [vp, u32, ctypes.POINTER(vp)]),
    ]:
        fn = getattr(sec, name)
        fn.restype, fn.argtypes = osstatus, args
    return cf, sec


def _const(lib, name: str) -> int:
    """Value of an exported ``CFStringRef`` constant (a pointer variable)."""
    return ctypes.c_void_p.in_dll(lib, name).value


def _cfstr(text: str) -> int:
    cf, _ = _load_security()
    ref = cf.CFStringCreateWithCString(None, text.encode("utf-8"), kCFStringEncodingUTF8)
    if not ref:
        raise OSError(errno.ENOMEM, "CFStringCreateWithCString failed")
    return ref


def _pystr(ref: Optional[int]) -> Optional[str]:
    cf, _ = _load_security()
    if not ref or cf.CFGetTypeID(ref) != cf.CFStringGetTypeID():
        return None
    buf = ctypes.create_string_buffer(4096)
    if not cf.CFStringGetCString(ref, buf, len(buf), kCFStringEncodingUTF8):
        return None
    return buf.value.decode("utf-8")


def _pybytes(ref: Optional[int]) -> Optional[bytes]:
    cf, _ = _load_security()
    if not ref or cf.CFGetTypeID(ref) != cf.CFDataGetTypeID():
        return None
    n = cf.CFDataGetLength(ref)
    return ctypes.string_at(cf.CFDataGetBytePtr(ref), n)


def _release(*refs) -> None:
    cf, _ = _load_security()
    for r in refs:
        if r:
            cf.CFRelease(r)


def _guest_for_token(words: Sequence[int]) -> int:
    """SecCodeRef of the process named by the audit token (caller releases)."""
    cf, sec = _load_security()
    raw = _AUDIT.pack(*[w & 0xFFFFFFFF for w in words])
    data = cf.CFDataCreate(None, raw, len(raw))
    key = ctypes.c_void_p(_const(sec, "kSecGuestAttributeAudit"))
    value = ctypes.c_void_p(data)
    key_cb = ctypes.addressof(ctypes.c_char.in_dll(cf, "kCFTypeDictionaryKeyCallBacks"))
    val_cb = ctypes.addressof(ctypes.c_char.in_dll(cf, "kCFTypeDictionaryValueCallBacks"))
    attrs = cf.CFDictionaryCreate(None, ctypes.byref(key), ctypes.byref(value), 1, key_cb, val_cb)
    code = ctypes.c_void_p()
    try:
        status = sec.SecCodeCopyGuestWithAttributes(None, attrs, kSecCSDefaultFlags, ctypes.byref(code))
    finally:
        _release(attrs, data)
    if status != 0 or not code.value:
        if status in (errSecCSNoSuchCode, errSecCSGuestInvalid):
            raise ProcessLookupError(errno.ESRCH, OSSTATUS_TEXT[status])
        raise SecError(status, f"SecCodeCopyGuestWithAttributes failed: OSStatus {status}")
    return code.value


def check_token(words: Sequence[int], requirement: str) -> tuple[int, str]:
    """Check the running code of the token's process against ``requirement``.

    Returns ``(OSStatus, text)``; 0 means valid and satisfying the requirement,
    anything else is a denial. Raises only FrameworkUnavailable (the caller may
    then use another check): a Security.framework error is never a reason to
    fall back to a weaker, path-based check.
    """
    cf, sec = _load_security()
    req = ctypes.c_void_p()
    text = _cfstr(requirement)
    try:
        status = sec.SecRequirementCreateWithString(text, kSecCSDefaultFlags, ctypes.byref(req))
    finally:
        _release(text)
    if status != 0:
        return status, f"requirement {requirement!r} does not compile (OSStatus {status})"
    try:
        try:
            code = _guest_for_token(words)
        except ProcessLookupError as exc:
            return errSecCSNoSuchCode, str(exc.strerror)
        except SecError as exc:
            return exc.status, str(exc.strerror)
        try:
            status = sec.SecCodeCheckValidity(code, kSecCSDefaultFlags, req.value)
        finally:
            _release(code)
    finally:
        _release(req.value)
    return status, OSSTATUS_TEXT.get(status, f"OSStatus {status}") if status else "valid"


def _check_valid(code: int) -> None:
    """SecCodeCheckValidity with no requirement: the running code (dynamic) and
    its signature on disk (static) must be valid; raises SecError otherwise."""
    _, sec = _load_security()
    status = sec.SecCodeCheckValidity(code, kSecCSDefaultFlags, None)
    if status != 0:
        raise SecError(status, f"the code is not valid: {OSSTATUS_TEXT.get(status, f'OSStatus {status}')}")


def _signing_info(code: int) -> dict:
    """Identifier, Team ID and cdhash of ``code``, validated.

    SecCodeCopySigningInformation reads a dynamic code's static information from
    the signature on disk, unvalidated (Apple's documentation of the call), so
    the code is validated first and again after the read: a signature swapped
    on disk in between fails the second check (errSecCSStaticCodeChanged).
    """
    cf, sec = _load_security()
    _check_valid(code)
    info = ctypes.c_void_p()
    status = sec.SecCodeCopySigningInformation(code, kSecCSSigningInformation, ctypes.byref(info))
    if status != 0:
        raise SecError(status, f"SecCodeCopySigningInformation failed: OSStatus {status}")
    try:
        get = cf.CFDictionaryGetValue
        cdhash = _pybytes(get(info.value, _const(sec, "kSecCodeInfoUnique")))
        result = {
            "identifier": _pystr(get(info.value, _const(sec, "kSecCodeInfoIdentifier"))),
            "team_id": _pystr(get(info.value, _const(sec, "kSecCodeInfoTeamIdentifier"))),
            "cdhash": cdhash.hex() if cdhash else None,
        }
    finally:
        _release(info.value)
    _check_valid(code)
    return result


def signing_info_for_token(words: Optional[Sequence[int]]) -> dict:
    """``{"identifier", "team_id", "cdhash"}`` of the token's process (values None if unsigned)."""
    if words is None:
        raise OSError(errno.EINVAL, "no audit token")
    code = _guest_for_token(words)
    try:
        return _signing_info(code)
    finally:
        _release(code)


def _self_code() -> int:
    _, sec = _load_security()
    code = ctypes.c_void_p()
    status = sec.SecCodeCopySelf(kSecCSDefaultFlags, ctypes.byref(code))
    if status != 0:
        raise SecError(status, f"SecCodeCopySelf failed: OSStatus {status}")
    return code.value


def self_signing_info() -> dict:
    """Signing information of this (the server's) process."""
    code = _self_code()
    try:
        return _signing_info(code)
    finally:
        _release(code)


def self_designated_requirement() -> Optional[str]:
    """This process's designated requirement as text, or None."""
    _, sec = _load_security()
    code = _self_code()
    req = ctypes.c_void_p()
    text = ctypes.c_void_p()
    try:
        if sec.SecCodeCopyDesignatedRequirement(code, kSecCSDefaultFlags, ctypes.byref(req)) != 0:
            return None
        if sec.SecRequirementCopyString(req.value, kSecCSDefaultFlags, ctypes.byref(text)) != 0:
            return None
        return _pystr(text.value)
    finally:
        _release(text.value, req.value, code)
