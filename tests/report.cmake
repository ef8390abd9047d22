# tests/report.cmake - kdkit report of a real run (train with SIGTERM, SIGKILL
# and resumes; teacher faults) rendered by headless Chromium, hostile text,
# and the page size of a long log.  See tests/report_e2e.sh.
add_test(NAME report_e2e
  COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/report_e2e.sh $<TARGET_FILE:kdkit_cli>
          ${PROJECT_SOURCE_DIR} ${CMAKE_CURRENT_BINARY_DIR}/report_e2e)
set_tests_properties(report_e2e PROPERTIES TIMEOUT 300)
add_test(NAME status_e2e
  COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/status_e2e.sh $<TARGET_FILE:kdkit_cli>
          ${PROJECT_SOURCE_DIR} ${CMAKE_CURRENT_BINARY_DIR}/status_e2e)
set_tests_properties(status_e2e PROPERTIES TIMEOUT 300)
add_test(NAME progress_e2e
  COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/progress_e2e.sh $<TARGET_FILE:kdkit_cli>
          ${CMAKE_CURRENT_BINARY_DIR}/progress_e2e)
