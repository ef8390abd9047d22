# The install rules, kdkit.pc and the CMake package, as a C user meets them:
# a prefix, a DESTDIR staging, a multiarch libdir, a configure without
# cmocka (tests/install_test.sh).
set(KD_INSTALL_TEST_FLAGS "")
if(KD_SANITIZE)
  set(KD_INSTALL_TEST_FLAGS "-fsanitize=address,undefined")
endif()
add_test(NAME install_pkgconfig
         COMMAND sh ${CMAKE_CURRENT_SOURCE_DIR}/install_test.sh ${PROJECT_BINARY_DIR}
                 ${PROJECT_SOURCE_DIR} ${CMAKE_C_COMPILER} "${KD_INSTALL_TEST_FLAGS}")
set_tests_properties(install_pkgconfig PROPERTIES TIMEOUT 300)
