# tests/abi.cmake - what an embedder of libkdkit.so sees (tests/abi_check.py):
# the dynamic symbol table exports exactly the KD_API functions of the public
# headers, the Python binding's ctypes names all resolve, and one version
# (kdkit/api.h, CMake, kdkit --version, the .so name, the Python package);
# internal symbols of libkdkit.a carry the kdi_ prefix.
# kd_version() itself is checked by tests/test_core_version.c.
add_test(NAME abi_exports
         COMMAND /usr/bin/python3 -B ${CMAKE_CURRENT_SOURCE_DIR}/abi_check.py ${PROJECT_SOURCE_DIR}
                 $<TARGET_FILE:kdkit> $<TARGET_FILE:kdkit_cli> ${PROJECT_VERSION}
                 $<TARGET_FILE:kdkit_static>)
set_tests_properties(abi_exports PROPERTIES TIMEOUT 60)
target_compile_definitions(test_core_version PRIVATE KD_PROJECT_VERSION="${PROJECT_VERSION}")
