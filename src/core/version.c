/*
 * core/version.c - kd_version(): the version of the library that is loaded,
 * from the KD_VERSION_* macros of kdkit/api.h (the one source of the version;
 * CMakeLists.txt reads its project version from the same macros).
 */
#include "kdkit/api.h"

const char *kd_version(void)
{
    return KD_VERSION_STRING;
}

int kd_version_number(void)
{
    return KD_VERSION_NUMBER;
}
