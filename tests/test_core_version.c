/*
 * test_core_version.c - kd_version(): the loaded library says which version
 * it is, and that is the version CMake builds (project version) and the
 * headers promise (KD_VERSION_STRING / KD_VERSION_NUMBER).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "kdkit/api.h"

static void test_version_matches_cmake_and_headers(void **state)
{
    (void)state;
    assert_non_null(kd_version());
    assert_string_equal(kd_version(), KD_PROJECT_VERSION);
    assert_string_equal(kd_version(), KD_VERSION_STRING);
    char expect[32];
    snprintf(expect, sizeof expect, "%d.%d.%d", kd_version_number() / 10000,
             kd_version_number() / 100 % 100, kd_version_number() % 100);
    assert_string_equal(expect, KD_PROJECT_VERSION);
    assert_int_equal(kd_version_number(), KD_VERSION_NUMBER);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_version_matches_cmake_and_headers),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
