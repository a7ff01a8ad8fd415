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


class AuditToken(ctypes.Structure):
    _fields_ = [("val", ctypes.c_uint32 * 8)]


def _token(words: Sequence[int]) -> AuditToken:
    t = AuditToken()
    for i, w in enumerate(words):
        t.val[i] = w & 0xFFFFFFFF
    return t


def _load_libc():
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "/usr/lib/libSystem.B.dylib", use_errno=True)
        lib.proc_pidpath_audittoken.argtypes = [ctypes.POINTER(AuditToken), ctypes.c_void_p, ctypes.c_uint32]
        lib.proc_pidpath_audittoken.restype = ctypes.c_int
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
    """True while ``pid`` still has this ``pidversion`` (same process, same exec)."""
    words = [0] * 8
    words[5], words[7] = pid, pidversion
    try:
        path_for_token(words)
    except OSError:
        return False
    return True


# -- CoreFoundation / Security.framework ------------------------------------


def _load_security():
    global _cf, _sec
    if _sec is None:
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
        _cf, _sec = cf, sec
    return _cf, _sec


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
        raise OSError(errno.EINVAL, f"SecCodeCopyGuestWithAttributes failed: OSStatus {status}")
    return code.value


def check_token(words: Sequence[int], requirement: str) -> tuple[int, str]:
    """Check the running code of the token's process against ``requirement``.

    Returns ``(OSStatus, text)``; 0 means valid and satisfying the requirement.
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
        try:
            status = sec.SecCodeCheckValidity(code, kSecCSDefaultFlags, req.value)
        finally:
            _release(code)
    finally:
        _release(req.value)
    return status, OSSTATUS_TEXT.get(status, f"OSStatus {status}") if status else "valid"


def _signing_info(code: int) -> dict:
    cf, sec = _load_security()
    info = ctypes.c_void_p()
    status = sec.SecCodeCopySigningInformation(code, kSecCSSigningInformation, ctypes.byref(info))
    if status != 0:
        raise OSError(errno.EINVAL, f"SecCodeCopySigningInformation failed: OSStatus {status}")
    try:
        get = cf.CFDictionaryGetValue
        cdhash = _pybytes(get(info.value, _const(sec, "kSecCodeInfoUnique")))
        return {
            "identifier": _pystr(get(info.value, _const(sec, "kSecCodeInfoIdentifier"))),
            "team_id": _pystr(get(info.value, _const(sec, "kSecCodeInfoTeamIdentifier"))),
            "cdhash": cdhash.hex() if cdhash else None,
        }
    finally:
        _release(info.value)


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
        raise OSError(errno.EINVAL, f"SecCodeCopySelf failed: OSStatus {status}")
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
