# The malloc-failure sweep (tests/alloc_sweep.c): libkdkit's allocations are
# routed through the test's counter with the linker's --wrap, so it is its
# own program rather than a tests/test_*.c.
add_executable(alloc_sweep ${CMAKE_CURRENT_SOURCE_DIR}/alloc_sweep.c)
target_link_libraries(alloc_sweep PRIVATE kd_test_support kdkit_static)
target_link_options(alloc_sweep PRIVATE -Wl,--wrap=malloc -Wl,--wrap=calloc -Wl,--wrap=realloc
                    -Wl,--wrap=strdup -Wl,--wrap=strndup -Wl,--wrap=asprintf)
add_test(NAME alloc_sweep COMMAND alloc_sweep)
set_tests_properties(alloc_sweep PROPERTIES TIMEOUT 600)
