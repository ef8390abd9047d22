# tests/ckpt.cmake - checkpoint interop with numpy (tests/ckpt_interop.py),
# run by Debian's /usr/bin/python3; scripts/install-deps.sh installs
# python3-numpy, and a missing numpy fails the test.  The C side is the
# test_ckpt_interop program, which the tests/ glob already builds.
add_test(NAME ckpt_interop_numpy
         COMMAND /usr/bin/python3 ${CMAKE_CURRENT_SOURCE_DIR}/ckpt_interop.py
                 $<TARGET_FILE:test_ckpt_interop> ${CMAKE_CURRENT_BINARY_DIR}/ckpt_interop)
set_tests_properties(ckpt_interop_numpy PROPERTIES TIMEOUT 300)
