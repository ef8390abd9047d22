/*
 * kdkit/api.h - the library's version and the KD_API marker of its public
 * functions.  Every other public header includes this one.
 *
 * libkdkit.so is built with -fvisibility=hidden: the only symbols it exports
 * are the functions declared with KD_API in the public headers
 * (include/kdkit/).  Everything else, internal functions shared between the
 * library's files included, stays inside the library, so an embedder cannot
 * come to depend on it and a name of ours cannot clash with one of theirs.
 * tests/abi_check.py checks that the exported set is exactly the KD_API set.
 * The static libkdkit.a carries
 * the same objects; hidden visibility does not restrict static linking.
 *
 * The version below is the one source of it: CMake's project version (and so
 * the shared library's file name, kdkit.pc and the CMake package version),
 * `kdkit --version` and kd_version() are all read from these three macros.
 */
#ifndef KDKIT_API_H
#define KDKIT_API_H

#if defined(__GNUC__) || defined(__clang__)
#define KD_API __attribute__((visibility("default")))
#else
#define KD_API
#endif

/* On a function whose result must be checked (a hash or path that may not
   have been produced): ignoring it is a compiler warning, an error with
   -Werror. */
#if defined(__GNUC__) || defined(__clang__)
#define KD_NODISCARD __attribute__((warn_unused_result))
#else
#define KD_NODISCARD
#endif

#define KD_VERSION_MAJOR 0
#define KD_VERSION_MINOR 1
#define KD_VERSION_PATCH 0

#define KD_VERSION_STR_(x) #x
#define KD_VERSION_STR(x) KD_VERSION_STR_(x)
/* "MAJOR.MINOR.PATCH", e.g. "0.1.0". */
#define KD_VERSION_STRING \
    KD_VERSION_STR(KD_VERSION_MAJOR) "." KD_VERSION_STR(KD_VERSION_MINOR) "." \
    KD_VERSION_STR(KD_VERSION_PATCH)
/* One integer that grows with every release: MAJOR*10000 + MINOR*100 + PATCH. */
#define KD_VERSION_NUMBER (KD_VERSION_MAJOR * 10000 + KD_VERSION_MINOR * 100 + KD_VERSION_PATCH)

#ifdef __cplusplus
extern "C" {
#endif

/*
 * The version of the library actually loaded, "MAJOR.MINOR.PATCH" (static
 * storage, never NULL).  Compare it with KD_VERSION_STRING, the version of
 * the headers a program was compiled against.  Cannot fail.
 */
KD_API
const char *kd_version(void);

/* The same as one number (KD_VERSION_NUMBER of the loaded library). */
/* Cannot fail. */
KD_API
int kd_version_number(void);

#ifdef __cplusplus
}
#endif
#endif
